"""Nipype workflow factories of the BIDS-App (keyword-only ``init_*_wf`` functions)."""
