"""``python -m repablate``: the main job (see repablate.train.main)."""

from repablate.train.main import main

if __name__ == "__main__":
    main()
