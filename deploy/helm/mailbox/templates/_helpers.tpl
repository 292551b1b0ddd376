{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "mailbox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name alone when it already
contains the chart name.
*/}}
{{- define "mailbox.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailbox.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "mailbox.labels" -}}
helm.sh/chart: {{ include "mailbox.chart" . }}
{{ include "mailbox.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Selector labels (immutable on a Deployment: keep them minimal).
*/}}
{{- define "mailbox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailbox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mailbox.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailbox.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailbox.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret holding NATS credentials: the existing one, the one this chart creates, or "".
*/}}
{{- define "mailbox.natsSecretName" -}}
{{- if .Values.nats.existingSecret }}
{{- .Values.nats.existingSecret }}
{{- else if .Values.nats.credsSecret.create }}
{{- printf "%s-nats" (include "mailbox.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Key of the .creds file inside the NATS Secret, or "" when the Secret holds none.
*/}}
{{- define "mailbox.natsCredsKey" -}}
{{- if .Values.nats.existingSecret }}
{{- .Values.nats.existingSecretKeys.creds }}
{{- else if and .Values.nats.credsSecret.create .Values.nats.credsSecret.creds }}
{{- "nats.creds" }}
{{- end }}
{{- end }}

{{/*
Key of field (user, password or token) inside the NATS Secret, or "".
Called with (list $ "user").
*/}}
{{- define "mailbox.natsSecretKey" -}}
{{- $root := index . 0 }}
{{- $field := index . 1 }}
{{- if $root.Values.nats.existingSecret }}
{{- index $root.Values.nats.existingSecretKeys $field }}
{{- else if and $root.Values.nats.credsSecret.create (index $root.Values.nats.credsSecret $field) }}
{{- $field }}
{{- end }}
{{- end }}

{{/*
Drain timeout in milliseconds, as the service reads it (its default is 30000).
*/}}
{{- define "mailbox.drainTimeoutMs" -}}
{{- $v := index .Values.config "MAILBOX_DRAIN_TIMEOUT_MS" | default "30000" | toString }}
{{- if not (regexMatch "^[0-9]+$" $v) }}
{{- fail (printf "config.MAILBOX_DRAIN_TIMEOUT_MS must be a whole number of milliseconds, got %q" $v) }}
{{- end }}
{{- $v }}
{{- end }}

{{/*
Render-time checks that a JSON schema cannot express. Included by every workload template.
*/}}
{{- define "mailbox.validate" -}}
{{- $drainMs := include "mailbox.drainTimeoutMs" . | int64 }}
{{- $graceMs := mul (.Values.terminationGracePeriodSeconds | int64) 1000 }}
{{- if le $graceMs $drainMs }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) must be longer than the drain timeout config.MAILBOX_DRAIN_TIMEOUT_MS (%d ms = %.1f s): the kubelet would kill pods before they finish draining" (.Values.terminationGracePeriodSeconds | int64) $drainMs (divf $drainMs 1000)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive (a KEDA ScaledObject creates its own HPA)" }}
{{- end }}
{{- if and .Values.nats.existingSecret .Values.nats.credsSecret.create }}
{{- fail "set either nats.existingSecret or nats.credsSecret.create, not both" }}
{{- end }}
{{- if .Values.nats.credsSecret.create }}
{{- $c := .Values.nats.credsSecret }}
{{- if not (or $c.creds $c.user $c.password $c.token) }}
{{- fail "nats.credsSecret.create is true but none of nats.credsSecret.creds/user/password/token is set" }}
{{- end }}
{{- end }}
{{- if not (index .Values.config "MAILBOX_NATS_URL") }}
{{- fail "config.MAILBOX_NATS_URL must point at an existing NATS with JetStream" }}
{{- end }}
{{- end }}
