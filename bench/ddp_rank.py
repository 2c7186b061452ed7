"""One rank of the `ddp` workload's data-parallel job: `python -m bench.ddp_rank SHAPES_JSON SEED THREADS`, started
by bench/workloads/ddp.py (RankGroup) with torchrun's environment; it builds its trainer, then runs one
train_step per "step" line on stdin (a module of its own, so that `-m` does not run the registered workload
module a second time as __main__)."""
import sys

from bench.workloads.ddp import rank_main

if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
