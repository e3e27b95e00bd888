"""Parts of ``benchmarks/personalize.py``, fedpeft's main job: per-client accuracy of each personalization method.

One concept per module:

- ``config``   the run configuration and the training budget shared by every method (hyper-parameters)
- ``shifts``   the visual domain shifts of ``--split domain`` (inverted, rotated, noisy, blurred, coloured, sketch)
- ``data``     the embedded data: scikit-learn's digits, the public/client split, domain and Dirichlet splits
- ``folders``  real data: one ImageFolder per client (``--data PATH``)
- ``backbone`` the frozen ViT: a small timm ViT pre-trained on the public split (cached), or a real timm model
- ``train``    the budget's local trainer (``fedpeft.protocols.LocalTrainer``), the optimizer rule every method shares
- ``methods``  each method's client model and its library protocol (``fedpeft.protocols``): no protocol lives here
- ``runner``   rounds × methods with the in-process engine (``fedpeft.protocols.Federation``) and a progress bar
- ``report``   the table, CSV, JSON and the accuracy-by-round plot
- ``cli``      the command line (``main(argv)``)

Every method uses fedpeft's public API only.
"""
