#!/bin/bash
exec onelayer-fast sweep --model smollm2-135m --task "rg:basic_arithmetic:max_terms=2,max_digits=1" \
  --layers 2,7,12,17,22,27 --learning-rates 6e-5,3e-4,1.5e-3 --full-learning-rates 4e-6,2e-5,1e-4 --seeds 2 \
  --steps 12 --batch-size 32 --num-generations 8 --max-completion-length 24 \
  --eval-size 300 --val-size 80 --save-steps 4 --lanes 12 --no-progress --out /work/grid2/sweep
