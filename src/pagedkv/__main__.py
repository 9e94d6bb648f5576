"""``python -m pagedkv``: the ``pagedkv`` command line."""

from pagedkv.cli import main

if __name__ == "__main__":
    main()
