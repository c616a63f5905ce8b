// Runs a Python file on MicroPython's WebAssembly port, with clients/micropython/sensorhub
// copied into its file system at /lib/sensorhub. Exit status 1 if the program raised.
// Usage: node run.mjs MICROPYTHON_MJS LIB_DIR PROGRAM
// A line `# --- step` splits the program into parts run one after the other (globals kept):
// this port's garbage collector frees memory only between parts, since it cannot scan the
// stack of running Python code, so memory is measured at the start of a part.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [mjs, libdir, program] = process.argv.slice(2);
const { loadMicroPython } = await import(pathToFileURL(mjs).href);
const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});
mp.FS.mkdirTree("/lib/sensorhub");
for (const name of fs.readdirSync(path.join(libdir, "sensorhub"))) {
  if (name.endsWith(".py")) {
    mp.FS.writeFile("/lib/sensorhub/" + name, fs.readFileSync(path.join(libdir, "sensorhub", name)));
  }
}
try {
  mp.runPython("import sys\nsys.path.insert(0, '/lib')\n");
  for (const part of fs.readFileSync(program, "utf8").split(/^# --- step$/m)) {
    mp.runPython(part);
  }
} catch (error) {
  process.stderr.write(String(error) + "\n");
  process.exit(1);
}
