"""Evaluation: scorers, paired statistics and reports that compare systems on the same prompts and
seeds (``stats``: McNemar's exact test and paired / cluster bootstrap intervals, numpy only;
``plots``: charts, which import matplotlib only when called). Nothing is re-exported here, so
``import img_guidance.eval`` stays cheap; import the modules themselves."""
