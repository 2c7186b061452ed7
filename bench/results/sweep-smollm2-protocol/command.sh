#!/bin/bash
exec onelayer-fast sweep --model smollm2-135m --task "rg:basic_arithmetic:max_terms=2,max_digits=1" \
  --layers 2,7,12,17,22,27 --learning-rates 1e-5,5e-5,2.5e-4 --seeds 2 \
  --steps 12 --batch-size 32 --num-generations 8 --max-completion-length 24 \
  --eval-size 300 --val-size 80 --save-steps 4 --lanes 12 --no-progress --out /work/grid/sweep
