# /// script
# dependencies = [
#     "trl-hsstar",
# ]
# ///
"""HS-STaR with the authors' DPO pairs of boundary problems (`HSStarDPOTrainer`).

# Qwen2.5-7B, full fine-tuning on 8 GPUs (the release's setting)
```bash
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml \
    recipes/hsstar_dpo.py --config recipes/configs/qwen2.5/7b_full_multi.yaml
```

# The embedded arithmetic world on a CPU
```bash
accelerate launch recipes/hsstar_dpo.py --config recipes/configs/toy_cpu.yaml --objective dpo \
    --learning_rate 1e-3 --output_dir runs/toy-dpo
```
"""

from trl_hsstar.recipe import main, make_parser

if __name__ == "__main__":
    script_args, training_args, model_args = make_parser("dpo").parse_args_and_config()
    script_args.objective = "dpo"
    main(script_args, training_args, model_args)
