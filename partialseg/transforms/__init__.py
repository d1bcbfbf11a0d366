"""MONAI transforms for partial, weak and missing labels (array transforms and ``d`` twins).

Groups, each an ``array.py`` + ``dictionary.py`` pair as in MONAI:

- ``partial``: PartialLabelToVector, RemapLabels, LateralSplit (the partial-label data model);
- ``distance``: SignedDistanceMap (DTML);
- ``spatial``: AtlasCrop (atlas method), invertible;
- ``intensity``: ModalityIntensity (atlas method: CT window or z-score, by each image's modality);
- ``mix``: ForegroundPaste (hybrid method);
- ``conditional``: ConditionalSupervision, SingleLabelView (DCL's CompNet);
- ``io``: LoadImageNamedd (MONAI's LoadImaged with errors naming the file), CaseNameToMetad,
  SavePrediction(d) (MONAI's SaveImage writing whole NIfTI files atomically, stamped with their run).
"""

from partialseg.transforms.distance import *  # noqa: F401,F403
from partialseg.transforms.distance import __all__ as _distance_all
from partialseg.transforms.intensity import *  # noqa: F401,F403
from partialseg.transforms.intensity import __all__ as _intensity_all
from partialseg.transforms.mix import *  # noqa: F401,F403
from partialseg.transforms.mix import __all__ as _mix_all
from partialseg.transforms.partial import *  # noqa: F401,F403
from partialseg.transforms.partial import __all__ as _partial_all
from partialseg.transforms.spatial import *  # noqa: F401,F403
from partialseg.transforms.spatial import __all__ as _spatial_all

from partialseg.transforms.dcl import *  # noqa: F401,F403,E402
from partialseg.transforms.dcl import __all__ as _dcl_all  # noqa: E402

from partialseg.transforms.io import *  # noqa: F401,F403,E402
from partialseg.transforms.io import __all__ as _io_all  # noqa: E402

__all__ = [*_partial_all, *_distance_all, *_spatial_all, *_intensity_all, *_mix_all, *_dcl_all, *_io_all]
