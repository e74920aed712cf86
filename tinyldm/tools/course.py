"""The course kit lives in `tinyldm.course` (python -m tinyldm.course); this name keeps older
commands working."""

from tinyldm.course.__main__ import main

if __name__ == "__main__":
    main()
