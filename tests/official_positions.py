"""The official M-RoPE rule (docs/design.md, "M-RoPE positions: the official rule"), written token by token as an
independent oracle.

Both installed references deviate for videos (4.57 truncates second_per_grid_ts to an integer,
5.x continues text after a video at start + max(h, w), ignoring time), so parity tests pass
these positions to the reference model instead of letting it compute its own."""

import torch


def official_positions(ids, image_grids, video_grids, seconds, *, image_id, video_id, tokens_per_second, merge=2):
    """Positions [3, len(ids)] for one unpadded sample. `tokens_per_second=None` is Qwen2-VL."""
    out, i, next_pos = [], 0, 0
    images, videos = iter(image_grids), iter(zip(video_grids, seconds))
    while i < len(ids):
        if ids[i] not in (image_id, video_id):
            out.append((next_pos, next_pos, next_pos))
            next_pos += 1
            i += 1
            continue
        is_video = ids[i] == video_id
        (t, h, w), second = next(videos) if is_video else (next(images), None)
        for f in range(t):
            if is_video and tokens_per_second is not None:
                time = int((torch.tensor(float(f)) * torch.tensor(second, dtype=torch.float32) * tokens_per_second).item())
            else:
                time = f
            for r in range(h // merge):
                for c in range(w // merge):
                    out.append((next_pos + time, next_pos + r, next_pos + c))
        i += t * h * w // merge**2
        next_pos = max(max(p) for p in out) + 1
    return torch.tensor(out, dtype=torch.long).T
