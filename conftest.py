"""Root pytest settings: the doctests of normlab/torch/ need the optional torch extra."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["normlab/torch"]
