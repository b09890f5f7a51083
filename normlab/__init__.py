"""normlab: every normalization layer is one operation on a pattern.

Batch, layer, instance, group and RMS norm all subtract a mean and divide by a standard
deviation; they differ only in *which* elements share those statistics. A pattern names
the input's axes and brackets the ones that share them::

    >>> import numpy as np, normlab
    >>> x = np.array([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]])
    >>> normlab.normalize(x, "[b] f")[:, 0].round(4).tolist()     # batch norm
    [1.2247, 0.0, -1.2247]
    >>> normlab.normalize(x, "b [f]")[2].tolist()                 # layer norm
    [0.0, 0.0, 0.0]
"""

from normlab import functional
from normlab.core import normalize, normalize_backward
from normlab.errors import InputError, NormlabError, ParamsError, PatternSyntaxError, ShapeError
from normlab.plan import Plan, make_plan

__version__ = "0.1.0"

__all__ = [
    "normalize",
    "normalize_backward",
    "make_plan",
    "Plan",
    "functional",
    "NormlabError",
    "PatternSyntaxError",
    "ShapeError",
    "ParamsError",
    "InputError",
    "__version__",
]
