"""`python -m trl_distill ...` is the `trl-distill` console script."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main())
