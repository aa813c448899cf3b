"""The decision log: one structured, masked record per decision, written off the request path.

``record.py`` turns a Decision (plus the request and its span) into a
``extauthz.decisionlog.v1.DecisionRecord`` and masks it; ``sink.py`` writes JSON lines to a
rotated file or stdout; ``log.py`` holds the bounded queue, the sampling and the writer
thread; ``settings.py`` the ``--decision-log*`` flags. See docs/decisions.md.
"""
