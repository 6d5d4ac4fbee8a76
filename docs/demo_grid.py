"""The README's picture of the demo model: a grid of its images, each under its prompt.

    python docs/demo_grid.py --output docs/demo-grid.png

Prompts marked * are combinations the model never saw in training (stable_diffusion_tf.training.data.HELD_OUT).
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stable_diffusion_tf.training import data  # noqa: E402

COMBINATIONS = [
    ("red", "circle", "white"), ("yellow", "square", "purple"), ("green", "triangle", "black"),
    ("white", "circle", "orange"), ("blue", "square", "yellow"), ("orange", "triangle", "blue"),
    ("black", "circle", "green"), ("purple", "triangle", "yellow"),
    ("red", "circle", "blue"), ("green", "square", "yellow"), ("blue", "triangle", "white"),
    ("purple", "square", "red"),
]
SCALE = 3  # each 64x64 picture is shown 3x larger, pixel for pixel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="docs/demo-grid.png")
    p.add_argument("--weights", default="demo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--columns", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from stable_diffusion_tf import StableDiffusion

    pipe = StableDiffusion.from_pretrained(args.weights)
    prompts = [data.CAPTION.format(colour=c, shape=s, background=b) for c, s, b in COMBINATIONS]
    result = pipe.text_to_image(prompts, seed=args.seed, batch_size=len(prompts))
    labels = [f"{'* ' if c in data.HELD_OUT else ''}{text}" for c, text in zip(COMBINATIONS, prompts)]
    grid(result.images, labels, args.columns).save(args.output)
    print(f"wrote {args.output}: {len(prompts)} prompts, seeds {result.seeds[0]}-{result.seeds[-1]}, DDIM 50 steps, "
          "guidance 7.5")


def grid(images, labels, columns: int) -> Image.Image:
    side = images[0].size[0] * SCALE
    font = ImageFont.load_default(size=13)
    cell_w, text_h, pad = side + 24, 36, 8
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x = pad + (i % columns) * cell_w
        y = pad + (i // columns) * (side + text_h + pad)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        words = label.split(" on ")
        draw.text((x, y + side + 3), words[0], fill="black", font=font)
        draw.text((x, y + side + 19), "on " + words[1] if len(words) > 1 else "", fill="black", font=font)
    return sheet


if __name__ == "__main__":
    main()
