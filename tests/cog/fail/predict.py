"""Fails every prediction: logs one line, then raises a ValueError naming the prompt."""

from cog import BaseRunner, Input


class Predictor(BaseRunner):
    def run(
        self,
        prompt: str = Input(description="Echoed in the error"),
        duration: int = Input(default=2, description="Ignored (tasklane's catalog passes it)"),
        fps: int = Input(default=4, description="Ignored"),
    ) -> str:
        print(f"checking the prompt {prompt!r}", flush=True)
        raise ValueError(f"the prompt was refused: {prompt}")
