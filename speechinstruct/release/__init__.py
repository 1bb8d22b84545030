"""A dataset out of the composed records: ``publish``, ``validate`` and ``report``.
"""
