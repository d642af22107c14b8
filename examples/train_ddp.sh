#!/usr/bin/env bash
# Trains on 2 processes of this machine, with gloo on CPU or NCCL on 2 GPUs: first with torchrun, then with
# accelerate launch. Every process reads its own share of the batches; gradients are averaged, so both end the
# step with the same weights. Extra arguments go to examples/finetune_text.py, e.g.
#   examples/train_ddp.sh --text-file my.txt --preset small --max-steps 200
# (Without GPUs, note that `accelerate launch --cpu` runs ONE process: use --multi_gpu with use_cpu in the
# script, as finetune_text.py does. For FSDP and several machines see examples/accelerate_configs/.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

torchrun --nproc_per_node 2 examples/finetune_text.py --max-steps 10 --output-dir runs/ddp_torchrun "$@"

accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    examples/finetune_text.py --max-steps 10 --output-dir runs/ddp_accelerate "$@"
