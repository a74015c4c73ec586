"""models layer of lightning_hessian (see DESIGN.md)."""
