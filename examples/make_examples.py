"""Write the demo's example pictures, clip and questions into examples/ (seeded, reproducible).

Usage: python examples/make_examples.py [--seed 4242]
"""

import argparse
import json
import os
import random
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import synthetic_tasks as tasks  # noqa: E402


def write_clip(frames, path, fps=2):
    """A lossless-enough H.264 clip (4:4:4, crf 0) at `fps` frames per second."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    questions = []
    for task in tasks.TASKS:
        example = tasks.sample(task, rng)
        visual = tasks.render(example)
        if example.is_video:
            name = f"{task}.mp4"
            write_clip(visual, os.path.join(HERE, name))
        else:
            name = f"{task}.png"
            visual.save(os.path.join(HERE, name))
        questions.append({"file": name, "kind": "video" if example.is_video else "image",
                          "question": example.question, "expected": example.answer})
    with open(os.path.join(HERE, "questions.json"), "w") as f:
        json.dump(questions, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
