"""Test harnesses (not part of the installed package): tiny real models built locally and a real vLLM server.

Importable as ``support.<module>`` from the tests (tests/ is on pytest's path) and from the benches (which put
tests/ on sys.path): nothing here ships in the wheel.
"""
