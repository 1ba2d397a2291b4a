"""Picking a few random frames of a video: decode up to the last pick vs seek to each pick.

The USCL clips stream takes 3 random frames per video per epoch. ``ultrasound.video.iter_frames``
grabs every frame up to the last pick; this measures whether seeking (OpenCV
``CAP_PROP_POS_FRAMES``, which decodes from the preceding keyframe) is cheaper on the POCUS
videos, and checks that the seeked frames equal the decoded ones.

Usage: python benchmarks/seek_vs_decode.py [--pocus DIR] [--videos 40] [--picks 3]
Prints one JSON object: seconds of each way, their ratio, and the frames that differ.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--picks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cv2.setNumThreads(1)  # as in ultrasound/video.py
    files = sorted(args.pocus.rglob("*.mp4"))[: args.videos]
    rng = np.random.default_rng(args.seed)
    decode_s = seek_s = 0.0
    differ = total = 0
    for path in files:
        cap = cv2.VideoCapture(str(path))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        if n < args.picks + 2:
            continue
        picks = sorted(rng.choice(n - 2, args.picks, replace=False).tolist())

        began = time.perf_counter()
        cap, decoded, index = cv2.VideoCapture(str(path)), {}, -1
        while index < picks[-1] and cap.grab():
            index += 1
            if index in picks:
                decoded[index] = cap.retrieve()[1]
        cap.release()
        decode_s += time.perf_counter() - began

        began = time.perf_counter()
        cap, seeked = cv2.VideoCapture(str(path)), {}
        for pick in picks:
            cap.set(cv2.CAP_PROP_POS_FRAMES, pick)
            seeked[pick] = cap.read()[1]
        cap.release()
        seek_s += time.perf_counter() - began

        for pick in picks:
            total += 1
            same = pick in decoded and seeked[pick] is not None and np.array_equal(decoded[pick], seeked[pick])
            differ += not same
    print(json.dumps({"videos": len(files), "picks_per_video": args.picks, "decode_to_last_pick_s": round(decode_s, 2),
                      "seek_s": round(seek_s, 2), "seek_over_decode": round(seek_s / decode_s, 2),
                      "frames_differing": differ, "frames": total, "cpus": os.cpu_count(),
                      "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
