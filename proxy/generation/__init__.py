"""Generations: everything derived from secrets, built and validated as named steps, swapped
whole on reload."""
