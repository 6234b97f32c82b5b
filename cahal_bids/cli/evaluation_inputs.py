"""The images ``cahal-eval`` evaluates: files, prepared folders and BIDS datasets.

One contrast (``--modality``) for the usual protocol (:func:`input_files`,
:func:`prepared_entries`); every contrast, each with its own, for ``--routes``
(:func:`split_inputs`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ['input_files', 'is_bids_dataset', 'prepared_entries', 'split_inputs']


def is_bids_dataset(path: Path) -> bool:
    """A BIDS dataset folder (not a folder prepared by ``cahal-train prepare``)."""
    return (
        path.is_dir()
        and (path / 'dataset_description.json').is_file()
        and not (path / 'prepared.json').is_file()
    )


def input_files(args: argparse.Namespace) -> list[Path]:
    """Images and prepared folders; BIDS datasets expanded to their matching images."""
    from cahal_bids.app.bids import collect_images, load_bids_filters, read_layout

    found: list[Path] = []
    filters = load_bids_filters(args.bids_filter_file) if args.bids_filter_file else None
    for path in args.inputs:
        if is_bids_dataset(path):
            layout = read_layout(path, validate=False)
            images = collect_images(
                layout,
                participant_labels=args.participant_label,
                modalities=(args.modality,),
                filters=filters,
            )
            for subject_images in images.values():
                found += [image.path for image in subject_images]
        else:
            found.append(path)
    return found


def prepared_entries(args: argparse.Namespace) -> list[Any]:
    """The inputs of :func:`input_files`, each prepared (in ``OUT/prepared``) or loaded."""
    from cahal_bids.core.errors import CahalError
    from cahal_bids.training.preparation import PreparedVolume, prepare_image

    entries = []
    for path in input_files(args):
        if path.is_dir():
            entries.append(PreparedVolume.load(path))
            continue
        if not path.exists():
            raise CahalError(f'{path}: input not found')
        entries.append(
            prepare_image(
                path,
                args.out / 'prepared',
                modality=args.modality,
                denoise=not args.no_denoise,
            )
        )
    return entries


def split_inputs(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The images of the inputs, of every contrast, each with its contrast.

    BIDS datasets give all their T1w, FLAIR and T2w images (``--participant-label``,
    ``--bids-filter-file``); a NIfTI file's contrast is its BIDS suffix; a prepared folder
    says its own.
    """
    from cahal_bids.app.bids import collect_images, load_bids_filters, read_layout
    from cahal_bids.core.errors import CahalError
    from cahal_bids.core.modalities import MODALITIES
    from cahal_bids.core.nifti import nifti_stem
    from cahal_bids.training.prepared import PreparedVolume

    filters = load_bids_filters(args.bids_filter_file) if args.bids_filter_file else None
    found: list[tuple[Path, str]] = []
    for path in args.inputs:
        if is_bids_dataset(path):
            images = collect_images(
                read_layout(path, validate=False),
                participant_labels=args.participant_label,
                modalities=MODALITIES,
                filters=filters,
            )
            found += [
                (image.path, image.modality) for subject in images.values() for image in subject
            ]
        elif path.is_dir():
            found.append((path, PreparedVolume.load(path).modality))
        elif not path.exists():
            raise CahalError(f'{path}: input not found')
        else:
            suffix = nifti_stem(path).rsplit('_', 1)[-1]
            if suffix not in MODALITIES:
                raise CahalError(
                    f'{path}: with --routes, a NIfTI input needs its contrast as its BIDS '
                    f'suffix (one of {", ".join(MODALITIES)}), found {suffix!r}'
                )
            found.append((path, suffix))
    return found
