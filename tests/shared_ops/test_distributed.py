"""``end_process_group``: the bundles' ``finalize`` step for torchrun runs."""

import socket
import subprocess
import sys

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from shared_ops.distributed import end_process_group

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
model(torch.ones(2, 3)).sum().backward()
end_process_group(settle_s=0.05)
assert not dist.is_initialized()
print("ended")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_run_with_a_live_group_ends_it_and_exits_cleanly():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port())], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ended"
