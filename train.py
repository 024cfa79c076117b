"""Train and test a CBAM-ResNet (CIFAR-10 by default; data=cifar100 or data=folder for others):

python train.py model.depth=50 model.use_cbam_block=true
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train(cfg: DictConfig) -> float | None:
    # Imported here: --help, --cfg and a sweep's parent process then never pay for importing Lightning.
    from cbam.training.run import main, sweep_objective

    return sweep_objective(main(cfg))  # what a Hydra sweeper optimises (hparams_search=optuna maximises it)


if __name__ == "__main__":
    train()
