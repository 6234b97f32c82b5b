"""Evaluation: the validation protocol, metrics, lesions, flat regions, reports, model cards."""
