"""Worked integrations of the kernels into other engines (see each module's docstring)."""
