"""Copy one Triton model folder and set its config parameters (init container of a model service).

usage: configure_model.py SRC DST CONFIG_NAME PARAMS_JSON
  SRC          the image's model folder, e.g. /opt/funchat/services/llm
  DST          the writable copy tritonserver loads (an emptyDir mounted as the model repository)
  CONFIG_NAME  "" for config.pbtxt, else configs/<CONFIG_NAME>.pbtxt (tritonserver --model-config-name)
  PARAMS_JSON  {"checkpoint": "/models/checkpoint", ...}: a key the config already has (string_value)
               gets the new value; a key it lacks is appended as a new parameters entry.
"""
import json
import re
import shutil
import sys


def set_parameters(text: str, params: dict) -> str:
    if not text.endswith("\n"):
        text += "\n"
    for key, value in params.items():
        pattern = re.compile(r'(\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*")[^"]*(")')
        text, n = pattern.subn(lambda m: m.group(1) + str(value).replace('"', '\\"') + m.group(2), text)
        if n == 0:
            text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        elif n > 1:
            raise SystemExit(f"configure_model: parameter {key!r} found {n} times in the config, expected once")
    return text


def main(argv: list) -> None:
    src, dst, config_name, params = argv[1], argv[2], argv[3], json.loads(argv[4])
    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = f"{dst}/config.pbtxt" if not config_name else f"{dst}/configs/{config_name}.pbtxt"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(set_parameters(text, params))
    print(f"configure_model: {path}: " + ", ".join(f"{k}={v}" for k, v in params.items()))


if __name__ == "__main__":
    main(sys.argv)
