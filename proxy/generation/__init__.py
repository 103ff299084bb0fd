"""Generations: everything derived from secrets, built and validated as named steps, swapped
whole on reload.

model.py (Generation, Site, ProcessModel), steps.py (the named steps, one table; key
custody), build.py (runs the steps: stop at the first failure, or a row for each),
holder.py (the generation being served, swapped), reload.py (triggers, build, swap).
"""
