"""HTTPS interception for a local dev proxy: the interception CA and the leaf certificates it mints.

A leaf package (it imports nothing from the project): configuration validates
the CA files with it, the proxy app serves TLS with the contexts it builds, and
the ``dev-ca`` command creates a CA with it.
"""
