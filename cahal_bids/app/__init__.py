"""The BIDS-App: dataset queries, run configuration, registration, reports, Nipype
interfaces and workflows."""
