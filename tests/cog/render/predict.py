"""Renders a small animated GIF, slowly, reporting progress: a stand-in for a video model.

Each second of `duration` takes `seconds_per_second` of wall time; a line `progress: N%` is
printed (and flushed) after each frame. The output is a 64x64 GIF of `duration * fps` frames
whose colour is derived from the prompt.
"""

import hashlib
import tempfile
import time

from cog import BaseRunner, Input, Path
from PIL import Image, ImageDraw

SIZE = 64


class Predictor(BaseRunner):
    def run(
        self,
        prompt: str = Input(description="What to render; picks the colour"),
        duration: int = Input(default=2, ge=1, le=8, description="Seconds of output"),
        fps: int = Input(default=4, ge=1, le=30, description="Frames per second"),
        seconds_per_second: float = Input(
            default=0.5, ge=0.0, le=10.0, description="Wall time per second of output"
        ),
    ) -> Path:
        # coglet validates nothing without the schema `cog build` writes: check here.
        if not 1 <= duration <= 8:
            raise ValueError(f"duration must be 1..8 seconds, not {duration}")
        if not 1 <= fps <= 30:
            raise ValueError(f"fps must be 1..30, not {fps}")
        digest = hashlib.sha256(prompt.encode()).digest()
        base = (digest[0], digest[1], digest[2])
        frames_total = duration * fps
        pause = seconds_per_second / fps
        print(f"rendering {frames_total} frames for {prompt!r}", flush=True)
        frames = []
        for i in range(frames_total):
            time.sleep(pause)
            frame = Image.new("RGB", (SIZE, SIZE), base)
            x = (i * SIZE) // frames_total
            ImageDraw.Draw(frame).rectangle([x, 24, x + 8, 40], fill=(255, 255, 255))
            frames.append(frame)
            print(f"progress: {(i + 1) * 100 // frames_total}%", flush=True)
        out = Path(tempfile.mkdtemp()) / "render.gif"
        frames[0].save(
            out,
            save_all=True,
            append_images=frames[1:],
            duration=1000 // fps,
            loop=0,
        )
        print("done", flush=True)
        return out
