"""Ray Serve deployments of RAP Serve: one file per deployment, and the app that binds them.

These modules import Ray Serve; the library `rap` never does.
"""
