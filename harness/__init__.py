"""The xenvtpm test harness: targets that bring up guests with a vTPM, their transports,
the pytest fixtures' building blocks and the ``python -m harness`` CLI.

Roles (STYLE.md 9): ``target.py`` names the protocols and capabilities, ``targets/*``
implement them, ``conftest.py`` chains target -> guest -> esapi.
"""
