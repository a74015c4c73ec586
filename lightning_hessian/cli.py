"""``hessian-train``: the LightningCLI of the package.

Usage::

    hessian-train fit --config configs/quickstart.yaml
    hessian-train fit --config configs/cifar_bs2048.yaml --trainer.devices=4
    hessian-train test --config configs/cifar_bs128.yaml --ckpt_path runs/cifar_bs128/version_0/checkpoints/last.ckpt
    hessian-train fit --config configs/cifar_bs128.yaml --print_config

The model is always :class:`~lightning_hessian.models.ImageClassifier` (``model:`` section, no
``class_path``); the data module is any :class:`~lightning_hessian.data.ImageDataModule`
subclass (``data: class_path: lightning_hessian.data.CIFAR10``). The CLI links:

* ``data.batch_size`` (the global batch) -> ``model.batch_size`` (learning-rate scaling);
* ``data.num_classes``, ``data.input_shape``, ``data.mean``, ``data.std`` -> the model (its
  input normalisation), when the classes are instantiated.

Default logger: TensorBoard under ``runs/<name>/version_<n>`` (``tensorboard --logdir runs``).
Invalid names (architecture, activation, optimiser, schedule, dataset) are reported with the
valid choices before anything is trained.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_hessian.data import DATASETS, ImageDataModule
from lightning_hessian.models import ImageClassifier

__all__ = ["HessianArgumentParser", "HessianCLI", "main"]

#: data module attributes copied into the model's constructor once the data module exists
_INSTANTIATION_LINKS = ("num_classes", "input_shape", "mean", "std")


class _DataAttribute:
    """``data -> data.<name>`` for instantiation links, tuples as lists (hparams.yaml stays plain
    YAML). A class, not a closure: ``ddp_spawn`` pickles the parser with the trainer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, data: ImageDataModule) -> Any:
        value = getattr(data, self.name)
        return list(value) if isinstance(value, tuple) else value


class HessianArgumentParser(LightningArgumentParser):
    """Adds the list of valid data modules to errors about the ``data`` section."""

    @override
    def error(self, message: str, *args: Any, **kwargs: Any) -> Any:
        if 'key "data"' in message:
            message += (
                f"\nValid data modules: {', '.join(DATASETS)} "
                "(data.class_path: lightning_hessian.data.<name>, or --data=<name>)"
            )
        return super().error(message, *args, **kwargs)


class HessianCLI(LightningCLI):
    """LightningCLI with the package's model, data modules, links and TensorBoard default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", HessianArgumentParser)
        trainer_defaults = {
            # a plain class_path dict, not lazy_instance: ddp_spawn must pickle the parser
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "hessian", "default_hp_metric": False},
            },
            **kwargs.pop("trainer_defaults", {}),
        }
        kwargs["trainer_defaults"] = trainer_defaults
        # config.yaml lands in the run's version directory; rerunning into it is fine.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.batch_size", "model.batch_size")
        for name in _INSTANTIATION_LINKS:
            parser.link_arguments("data", f"model.{name}", compute_fn=_DataAttribute(name), apply_on="instantiate")

    @override
    def instantiate_classes(self) -> None:
        # Bad names and values surface as ValueError from the constructors: report them like a
        # parse error (usage + message, exit code 2) instead of a traceback.
        try:
            super().instantiate_classes()
        except ValueError as err:
            self.parser.error(str(err))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hessian-train`` console script."""
    HessianCLI(args=args)


if __name__ == "__main__":
    main()
