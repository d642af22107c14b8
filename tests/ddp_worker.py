"""A few data-parallel training steps of a tiny Titans model; run by tests/test_distributed.py under
`torchrun --nproc_per_node 2` or `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU, NCCL on GPUs).

Accelerate shards the batches over the processes and DDP averages the gradients, so every rank must end with the
same parameters, equal to one process training on the combined batches. Each rank saves its parameters to
`<out_dir>/rank<r>.pt`.

    python tests/ddp_worker.py OUT_DIR [VARIANT]
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from modeling_titans import TitansConfig, TitansForCausalLM

PER_DEVICE_BATCH = 2
STEPS = 3
LEARNING_RATE = 0.5
SEQ_LEN = 16


def make_model(variant: str) -> TitansForCausalLM:
    torch.manual_seed(0)
    return TitansForCausalLM(TitansConfig.from_preset("tiny", variant=variant))


def make_rows(num_rows: int) -> torch.Tensor:
    """Token rows of equal length: then the mean of per-rank mean losses is the mean over the combined batch."""
    return torch.randint(3, 259, (num_rows, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def main(out_dir: str, variant: str = "mac") -> None:
    # Without a GPU, accelerate starts gloo DDP only when asked for the CPU; otherwise every process would
    # silently train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = make_model(variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    rows = make_rows(PER_DEVICE_BATCH * accelerator.num_processes * STEPS)
    loader = DataLoader(rows, batch_size=PER_DEVICE_BATCH)  # process r gets batches r, r + world, ...
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    state = {name: p.detach().cpu() for name, p in accelerator.unwrap_model(model).named_parameters()}
    torch.save({"parameters": state, "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type)},
               Path(out_dir) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
