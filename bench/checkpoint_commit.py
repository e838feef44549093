"""How long a training checkpoint of the largest cluster model takes to commit to a Cloud Storage API: the
weights of ViViT-L (the paper's K400 model, 32 frames, 400 classes) and its SGD momentum buffers, written by
`checkpoints.save` as the trainer writes one, to a GCS emulator on loopback (`gcp-storage-emulator`, in
memory). Sizes the termination grace period of the training pods (kubeflow/trainjob.py GRACE_S).

    python bench/checkpoint_commit.py [--variant L] [--repeats 2]

The emulator is a single-threaded Python server on this machine: its rate is not Cloud Storage's. The result
records bytes and seconds, so the time at another throughput is bytes / rate.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402


def _emulator() -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the GCS emulator did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="L")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    from sfa_vivit.models import checkpoints
    from sfa_vivit.models.vivit import vivit
    proc, host = _emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        from sfa_vivit.core.storage import url_to_fs
        fs, _ = url_to_fs("gs://sfa-bench")
        fs.mkdir("sfa-bench")
        model = vivit(args.variant, num_frames=args.frames, num_classes=args.classes, image_size=224)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():                       # the momentum buffers a step leaves
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        state, opt = checkpoints.optimizer_state(model, optimizer)
        nbytes = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *state.values()])
        rows = []
        for repeat in range(args.repeats):
            url = f"gs://sfa-bench/run/checkpoints/step-{repeat:08d}"
            start = time.perf_counter()
            checkpoints.save(model, url, extra={"optimizer": opt}, state=state)
            seconds = time.perf_counter() - start
            rows.append(round(seconds, 2))
            print(f"{args.variant}: {nbytes / 1e9:.2f} GB committed in {seconds:.1f} s "
                  f"({nbytes / 1e6 / seconds:.0f} MB/s)", flush=True)
        local = tempfile.mkdtemp(prefix="sfa-ckpt-")
        start = time.perf_counter()
        checkpoints.save(model, os.path.join(local, "step"), extra={"optimizer": opt}, state=state)
        local_s = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(10)
    path = save(f"checkpoint_commit_{args.variant}", {
        "variant": args.variant, "frames": args.frames, "classes": args.classes,
        "parameters": model.num_parameters(), "bytes": nbytes, "emulator_seconds": rows,
        "emulator_mb_per_s": round(nbytes / 1e6 / min(rows), 1), "local_disk_seconds": round(local_s, 2),
        "seconds_at_100_mb_per_s": round(nbytes / 100e6, 1)})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
