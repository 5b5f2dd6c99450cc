"""kithmail's SMTP-facing services: the Postfix policy service (`policy`).

The inbound listener and the submission listener join this package with the
gateway issue.
"""
