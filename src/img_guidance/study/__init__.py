"""The A/B preference study: two systems' images of the same prompts and seeds, shown to people in
pairs, their votes kept in SQLite, and the paper's user-study numbers computed from them.

- ``pairs``: which images pair up (a ``generate`` folder's initial and calibrated images, or two
  folders matched by prompt and seed), the reproducible sample, and each rater's order of trials
  with the repeated, side-swapped consistency checks;
- ``store``: the study folder (``study.sqlite`` in WAL mode, the copied images) and every read and
  write of votes;
- ``stats``: preference rates with a bootstrap interval over pairs and raters, per-rater
  consistency, Fleiss' kappa (numpy only);
- ``report``: the Markdown table, the JSON and the bar chart of ``study results``;
- ``app``: the rating web app (FastAPI, Jinja2 templates) over the JSON API.

Nothing is re-exported, so ``import img_guidance.study`` stays cheap; import the modules themselves.
"""
