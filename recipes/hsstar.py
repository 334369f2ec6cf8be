# /// script
# dependencies = [
#     "trl-hsstar",
# ]
# ///
"""HS-STaR with SFT on the correct rationales of boundary problems (`HSStarTrainer`).

# The embedded arithmetic world on a CPU (no download)
```bash
accelerate launch recipes/hsstar.py --config recipes/configs/toy_cpu.yaml
```

# Qwen2.5-Math-1.5B with QLoRA on one consumer GPU
```bash
accelerate launch --config_file accelerate_configs/single_gpu.yaml \
    recipes/hsstar.py --config recipes/configs/qwen2.5_math/1.5b_qlora_single.yaml
```

Any field can be overridden on the command line, e.g. `--num_iterations 1 --output_dir runs/try`.
Rerunning the same command with the same `output_dir` resumes where the run stopped.
"""

from trl_hsstar.recipe import main, make_parser

if __name__ == "__main__":
    script_args, training_args, model_args = make_parser("sft").parse_args_and_config()
    if script_args.objective != "sft":
        raise SystemExit("recipes/hsstar.py trains with SFT; use recipes/hsstar_dpo.py for `objective: dpo`.")
    main(script_args, training_args, model_args)
