"""Tools, each run as `python -m tinyldm.tools.NAME`; none of the paper's code imports them.

    evaluate.py   sample N images from a checkpoint and measure them
                  (FD / FID, KID, precision / recall)
    bench.py      speed, FLOPs and memory against diffusers' models of the same size
                  (bench_models.py: the configs and diffusers' counterparts; bench_data.py: the data
                  loader's speed; bench_report.py: the ratios and the table)
    course.py     the course kit: student copies with solution regions cut out, and their grading
    nbrun.py      run the notebooks top to bottom and keep their outputs
"""
