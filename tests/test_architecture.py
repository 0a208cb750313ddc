"""The rules a dispatcher host relies on."""

import subprocess
import sys

from tests.conftest import ROOT


def test_farm_and_dispatcher_import_no_gpu_stack():
    code = (
        "import sys, pkgutil, importlib\n"
        "for pkg in ('farm', 'dispatcher'):\n"
        "    m = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(m.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_celery_accepts_json_only():
    from farm.celery_app import make_celery
    from farm.settings import Settings

    conf = make_celery(Settings(broker_url="redis://127.0.0.1:1/0")).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # A worker takes from its own queue no more than the feeder's window, which is all that is there.
    from farm.pool import WINDOW

    assert conf.worker_prefetch_multiplier == WINDOW == 2
