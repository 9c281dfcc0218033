// ComfyUI entry of the Qwen-Image frontend extension (served from WEB_DIRECTORY = "./web").
// The logic lives in qwen_image_logic.js so it can be tested without a browser.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createExtension } from "./qwen_image_logic.js";

app.registerExtension(createExtension(app, api));
