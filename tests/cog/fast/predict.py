"""Answers at once with a tiny text file holding the prompt (for benchmarks)."""

import tempfile

from cog import BaseRunner, Input, Path


class Predictor(BaseRunner):
    def run(self, prompt: str = Input(default="", description="Written to the output")) -> Path:
        out = Path(tempfile.mkdtemp()) / "out.txt"
        out.write_text(prompt or "ok")
        return out
