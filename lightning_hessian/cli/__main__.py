"""``python -m lightning_hessian.cli``: ``hessian-train`` (the command ``hessian-sweep`` runs)."""

from lightning_hessian.cli.train import main

if __name__ == "__main__":
    main()
