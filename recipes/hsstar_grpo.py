# /// script
# dependencies = [
#     "trl-hsstar",
# ]
# ///
"""GRPO with HS-STaR's allocation of rollouts (`HSStarGRPOTrainer`): each generation round's prompts drawn by
difficulty, boundary prompts most, at plain GRPO's number of completions.

# The embedded arithmetic world on a CPU (no download)
```bash
accelerate launch recipes/hsstar_grpo.py --config recipes/configs/grpo_toy_cpu.yaml
```

GRPOConfig's fields keep their names; any can be overridden on the command line, e.g. `--allocation uniform`.
"""

from trl_hsstar.recipe import main, make_parser

if __name__ == "__main__":
    script_args, training_args, model_args = make_parser("grpo").parse_args_and_config()
    if script_args.objective != "grpo":
        raise SystemExit("recipes/hsstar_grpo.py trains with GRPO: set `objective: grpo`.")
    main(script_args, training_args, model_args)
