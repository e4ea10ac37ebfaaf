"""Data: indexed-dataset checks, sample sources, the plan and the loader."""
