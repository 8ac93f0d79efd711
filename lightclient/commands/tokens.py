"""``lightclient tokens`` and ``lightclient keygen``: PKCS#11 token tooling (python-pkcs11)."""
from __future__ import annotations

import os

from .. import token as tk
from ..exceptions import ConfigError, ModuleLoadError, PinError, TokenNotFoundError
from .common import EXIT_OK, add_pin_options, env_help, resolve_pin, setting

COMMON_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so",
)


def register(sub) -> None:
    p = sub.add_parser("tokens", help="list PKCS#11 slots, tokens and (with a PIN) their private keys",
                       description="List the tokens a PKCS#11 module shows. With a PIN (from --pin-file, "
                                   "--pin-env or LIGHTCLIENT_PIN) also list the private keys of --token, or of "
                                   "the only token, with the key reference to use for each.")
    _module_option(p)
    p.add_argument("--token", help="only this token (label)")
    add_pin_options(p.add_argument_group("PIN"))
    p.set_defaults(func=run_tokens)

    p = sub.add_parser("init-token", help="initialise a token (SoftHSM2, tpm2-pkcs11) with an SO PIN and a user PIN",
                       description="Initialise the first free slot's token with a label, a security-officer PIN "
                                   "and a user PIN (PKCS#11 C_InitToken + C_InitPIN). PINs come from files, the "
                                   "environment or a terminal prompt, never from the command line. For "
                                   "tpm2-pkcs11 run `tpm2_ptool init` first.")
    _module_option(p)
    p.add_argument("--label", required=True, help="label for the new token (1-32 bytes)")
    p.add_argument("--so-pin-file", help=f"file holding the SO PIN (or set {SO_PIN_ENV})")
    add_pin_options(p.add_argument_group("user PIN"))
    p.set_defaults(func=run_init_token)

    p = sub.add_parser("keygen", help="create a device key pair on a PKCS#11 token",
                       description="Create a key pair on a token. The private key is private, sensitive and "
                                   "non-extractable: it can sign, and can never be read out. Prints the key "
                                   "reference to give to csr, doctor, provision and send.")
    _module_option(p)
    p.add_argument("--token", required=True, help="label of the token to create the key on")
    p.add_argument("--label", required=True, help="label for the new key (how it is found again)")
    p.add_argument("--type", dest="key_type", default="ec-p256", choices=tk.KEY_TYPES + (tk.SECRET_KEY_TYPE,),
                   help="key type (default ec-p256); hmac: a 32-byte symmetric key for SAS tokens, created in "
                        "the token (the hub must learn it another way: usually import-key the hub's key instead)")
    p.add_argument("--id", dest="key_id", metavar="HEX", help="CKA_ID for the key pair (default: 8 random bytes)")
    add_pin_options(p.add_argument_group("PIN"))
    p.set_defaults(func=run_keygen)

    p = sub.add_parser("import-key", help="import a device's symmetric (SAS) key into a PKCS#11 token",
                       description="Import a base64 symmetric key (IoT Hub primary/secondary key, a connection "
                                   "string's SharedAccessKey, a DPS enrollment key) as a sensitive, non-extractable "
                                   "HMAC-SHA256 signing key. The key is read from --key-file, from stdin (--key-file "
                                   "-) or a terminal prompt, never from the command line. Delete the source after.")
    _module_option(p)
    p.add_argument("--token", required=True, help="label of the token to import into")
    p.add_argument("--label", required=True, help="label for the key (how it is found again)")
    p.add_argument("--key-file", metavar="FILE", help="file holding the base64 key, or - for stdin")
    add_pin_options(p.add_argument_group("PIN"))
    p.set_defaults(func=run_import_key)


def _module_option(p) -> None:
    p.add_argument("--module-path", "--pkcs11-module", dest="module_path",
                   help=env_help("module_path", "the PKCS#11 module (.so)"))


def module_path(args) -> str:
    path = setting(args, "module_path")
    if path:
        if not os.path.exists(path):
            raise ModuleLoadError(f"the PKCS#11 module {path!r} does not exist: install it (SoftHSM: apt install "
                                  "softhsm2; TPM: apt install libtpm2-pkcs11-1) or fix --module-path")
        return path
    found = []
    for m in COMMON_MODULES:
        if os.path.exists(m) and not any(os.path.samefile(m, f) for f in found):
            found.append(m)
    if len(found) == 1:
        return found[0]
    hint = f"; found here: {', '.join(found)}" if found else " (none of the usual ones is installed here)"
    raise ConfigError("which PKCS#11 module? pass --module-path or set LIGHTCLIENT_MODULE_PATH" + hint)


def run_tokens(args) -> int:
    module = module_path(args)
    listed = tk.list_tokens(module)
    tokens = [t for t in listed if t.label]
    print(f"module {module}")
    if not tokens:
        print("  no initialised tokens (create one: softhsm2-util --init-token --free --label NAME, "
              "or tpm2_ptool addtoken)")
        return EXIT_OK
    if args.token and not any(t.label == args.token for t in tokens):
        raise TokenNotFoundError(f"no token labelled {args.token!r}; tokens present: "
                                    + ", ".join(repr(t.label) for t in tokens))
    targets = [t for t in tokens if t.label == args.token] if args.token else tokens
    pin = resolve_pin(args, prompt=False)
    for t in listed:
        if not t.label:
            print(f"slot {t.slot_id}  (free: no initialised token)")
    for t in targets:
        print(f"slot {t.slot_id}  token {t.label!r}  serial {t.serial}  {t.manufacturer} {t.model}".rstrip())
        if pin is None:
            continue
        if len(targets) > 1:
            print("  (give --token LABEL to list keys: the PIN belongs to one token)")
            continue
        keys = tk.list_keys(module, t.label, pin)
        if not keys:
            print("  no private keys (create one: lightclient keygen --token "
                  f"{t.label} --label device-key)")
        for k in keys:
            print(f"  key {k.label!r}  {k.key_type}  id {k.id_hex or '-'}")
            print(f"      {k.uri(module)}")
    if pin is None:
        print("(give a PIN with --pin-file FILE or LIGHTCLIENT_PIN to list private keys)")
    return EXIT_OK


SO_PIN_ENV = "LIGHTCLIENT_SO_PIN"


def run_init_token(args) -> int:
    import getpass
    import sys

    from ..keys import read_pin_file

    module = module_path(args)
    if args.so_pin_file:
        so_pin = read_pin_file(args.so_pin_file)
    elif os.environ.get(SO_PIN_ENV):
        so_pin = os.environ.pop(SO_PIN_ENV)  # not inherited by any child process
    elif sys.stdin is not None and sys.stdin.isatty():
        so_pin = getpass.getpass(f"new SO PIN for token {args.label!r}: ")
    else:
        raise PinError(f"init-token needs an SO PIN: give --so-pin-file FILE or set {SO_PIN_ENV}")
    pin = resolve_pin(args, f"the new token {args.label!r}")
    if pin is None:
        raise PinError("init-token needs the new user PIN: give --pin-file FILE or set LIGHTCLIENT_PIN")
    info = tk.init_token(module, args.label, so_pin, pin)
    # The slot id as `tokens` (and every later process) sees it: SoftHSM gives an initialised token a new
    # slot id, but only from the module's next initialisation, so the id init_token saw is stale.
    slot = next((t.slot_id for t in tk.list_tokens(module) if t.serial == info.serial), info.slot_id)
    print(f"initialised token {info.label!r} (serial {info.serial}) in slot {slot} of {module}")
    pin_hint = f" --pin-file {args.pin_file}" if args.pin_file else ""
    print(f"next: lightclient keygen --module-path {module} --token {info.label} --label device-key{pin_hint}")
    return EXIT_OK


def _read_key_text(args) -> str:
    import getpass
    import sys

    if args.key_file == "-":
        return sys.stdin.readline(4096).strip()
    if args.key_file:
        from ..keys import read_pin_file  # bounded, regular files only; errors never show the content

        return read_pin_file(args.key_file).strip()
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass("base64 device key (input hidden): ").strip()
    raise ConfigError("import-key needs the key: give --key-file FILE (or - for stdin), or run it on a terminal "
                      "to be asked; never put the key on the command line")


def run_import_key(args) -> int:
    module = module_path(args)
    key_text = _read_key_text(args)
    pin = resolve_pin(args, f"token {args.token!r}")
    if pin is None:
        raise PinError("import-key needs the token's user PIN: give --pin-file FILE or set LIGHTCLIENT_PIN")
    # In a child: this process may not initialise the module (see lightclient.token).
    info = tk.KeyInfo(**tk.run_in_child("import-secret", module_path=module, token_label=args.token,
                                        key_label=args.label, key_b64=key_text, pin=pin))
    del key_text
    uri = info.uri(module)
    print(f"imported the symmetric key as {info.label!r} (id {info.id_hex}) on token {args.token!r}: it is "
          "sensitive and non-extractable and can only sign SAS tokens (HMAC-SHA256)")
    print("key reference (use it with --sas-key, or set LIGHTCLIENT_SAS_KEY):")
    print(uri)
    where = f"the file {args.key_file!r}" if args.key_file and args.key_file != "-" else "wherever you copied it from"
    print(f"now delete the key from {where} (and any connection string holding it): the token has it")
    return EXIT_OK


def run_keygen(args) -> int:
    module = module_path(args)
    if args.key_type == tk.SECRET_KEY_TYPE:
        pin = resolve_pin(args, f"token {args.token!r}")
        if pin is None:
            raise PinError("keygen needs the token's user PIN: give --pin-file FILE or set LIGHTCLIENT_PIN")
        info = tk.KeyInfo(**tk.run_in_child("keygen-secret", module_path=module, token_label=args.token,
                                            key_label=args.label, pin=pin))
        print(f"created HMAC key {info.label!r} (id {info.id_hex}) on token {args.token!r}: sensitive, "
              "non-extractable, sign-only")
        print("key reference (use it with --sas-key):")
        print(info.uri(module))
        return EXIT_OK
    pin = resolve_pin(args, f"token {args.token!r}")
    if pin is None:
        raise PinError("keygen needs the token's user PIN: give --pin-file FILE or set LIGHTCLIENT_PIN "
                          "(or run it on a terminal to be asked)")
    key_id = None
    if args.key_id:
        try:
            key_id = bytes.fromhex(args.key_id)
        except ValueError:
            raise ConfigError(f"--id {args.key_id!r} is not hex, e.g. 01a2") from None
    info = tk.generate_keypair(module, args.token, pin, args.label, args.key_type, key_id=key_id)
    uri = info.uri(module)
    print(f"created key pair {info.label!r} ({args.key_type}, id {info.id_hex}) on token {args.token!r}: "
          "the private key is sensitive and non-extractable")
    print("key reference (use it with --key, or set KEY_IDENTIFIER):")
    print(uri)
    pin_hint = f" --pin-file {args.pin_file}" if args.pin_file else ""
    print(f"next: lightclient csr --key '{uri}' --device-id DEVICE_ID{pin_hint} --out device.csr")
    return EXIT_OK
