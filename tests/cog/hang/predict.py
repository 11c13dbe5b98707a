"""Never finishes: logs one line, then sleeps in small steps until cancelled."""

import time

from cog import BaseRunner, Input


class Predictor(BaseRunner):
    def run(
        self,
        prompt: str = Input(default="", description="Ignored"),
        duration: int = Input(default=2, description="Ignored (tasklane's catalog passes it)"),
        fps: int = Input(default=4, description="Ignored"),
    ) -> str:
        print(f"hanging on {prompt!r}", flush=True)
        while True:
            time.sleep(0.05)
