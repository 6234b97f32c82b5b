"""The methods text (citation boilerplate) of a run: what was done, with which versions."""

from __future__ import annotations

from importlib import metadata

from cahal_bids import __version__
from cahal_bids.app.config import RunConfig

__all__ = ['boilerplate']


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return 'unknown'


def boilerplate(config: RunConfig) -> str:
    """Markdown methods text for ``logs/CITATION.md`` and the reports."""
    modalities = ' and '.join(config.modalities)
    steps = []
    if config.denoise:
        steps.append(
            f'Each {modalities} image was first denoised with the adaptive non-local means '
            f'filter of ANTs (Rician noise model; ANTs through antspyx {_version("antspyx")}).'
        )
    steps.append(
        'Images with any voxel dimension above 1 mm were restored to 1 mm isotropic '
        'resolution in their native space with CAHAL (Morell-Ortega et al., '
        f'as implemented in cahal-bids {__version__}): each image was resampled trilinearly '
        'onto a 1 mm grid that keeps its own voxel axes and field of view, and a residual '
        '3D U-Net added the missing high-frequency content. The network was one of 18 '
        'experts of a deterministic mixture, chosen from the image header alone by voxel '
        'volume (7 bins) and anisotropy (3 bins). Images already at 1 mm or finer were '
        f'kept as they were. PyTorch {_version("torch")} ran the experts.'
    )
    if not config.skip_registration:
        reference = (
            config.template
            if not config.template_file
            else (f'{config.template} (from {config.template_file})')
        )
        steps.append(
            'A rigid then affine transform from each restored image to the '
            f'{reference} template was estimated with ANTs (Mattes mutual information); '
            'FLAIR images were also aligned rigidly to the T1w image of the same participant. '
            'Restored images were left in native space'
            + (' and additionally resampled into the template.' if config.output_spaces else '.')
        )
    steps.append(
        f'The pipeline was built with Nipype {_version("nipype")} and the dataset was read '
        f'with PyBIDS {_version("pybids")}.'
    )
    references = (
        '### References\n\n'
        '- Morell-Ortega et al., CAHAL: clinically applicable resolution enhancement for '
        'low-resolution MRI scans.\n'
        '- Avants et al., A reproducible evaluation of ANTs similarity metric performance in '
        'brain image registration, NeuroImage 2011.\n'
        '- Manjon et al., Adaptive non-local means denoising of MR images with spatially '
        'varying noise levels, JMRI 2010.\n'
        '- Gorgolewski et al., Nipype, Front. Neuroinform. 2011.\n'
        '- Yarkoni et al., PyBIDS, JOSS 2019.\n'
    )
    return '### Methods\n\n' + '\n\n'.join(steps) + '\n\n' + references
